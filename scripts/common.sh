# Sourced by the test scripts (test.sh, test-aarch64.sh, reliability.sh).
# Every step's line carries the time since the suite started (TQ_T0, set by the first script).
export TQ_T0=${TQ_T0:-$(date +%s)}
log() { local t=$(($(date +%s) - TQ_T0)); printf '\n==> [%d:%02d] %s\n' $((t / 60)) $((t % 60)) "$*"; }
# Sanitizer builds: -O1 (what the sanitizers' docs recommend) and line tables only, which
# compile in about 60% of RelWithDebInfo's -O2 -g time; reports still name file and line.
SAN_OPT=${TQ_SAN_OPT:--O1 -g1}
