import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "turboquant", "distortion", *args],
                          capture_output=True, text=True, check=True).stdout


def test_distortion_table_within_bounds(tmp_path):
    out = run("--dims", "64,128", "--bits", "1,2,3", "--vectors", "400", "--plot", str(tmp_path / "d.png"))
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("turboquant_", "polar", "qjl"))]
    assert len(rows) == 4 * 2 * 3
    for method, d, b, nbytes, mse, lo, up, ipvar, upip, bias, se in rows:
        mse, lo, up, bias, se = map(float, (mse, lo, up, bias, se))
        if method in ("turboquant_mse", "polar"):
            assert lo < mse < up
        if method == "turboquant_mse":
            assert bias < -3 * se  # multiplicative shrinkage
        if method == "turboquant_prod":
            assert abs(bias) < 4 * se and float(ipvar) < float(upip)
    assert (tmp_path / "d.png").stat().st_size > 10_000


def test_compare_mode():
    out = run("--compare", "--seeds", "2")
    line = next(ln for ln in out.splitlines() if ln.startswith("turboquant_mse") and " 3 " in ln)
    corr = float(line.split()[4])
    assert 0.97 < corr < 0.995
