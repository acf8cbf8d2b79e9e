// Stand-in for the Apple SDK header of the same name: only what metal-cpp needs to be
// parsed on Linux by scripts/check-metal-host.sh. Never used in a real build.
#pragma once
typedef double CGFloat;
struct CGSize { CGFloat width, height; };
