// Stand-in for the Apple SDK header of the same name: only what metal-cpp needs to be
// parsed on Linux by scripts/check-metal-host.sh. Never used in a real build.
#pragma once
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_MAC 1
