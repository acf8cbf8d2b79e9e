// Stand-in for the Apple SDK header of the same name: only what metal-cpp needs to be
// parsed on Linux by scripts/check-metal-host.sh. Never used in a real build.
#pragma once
#include "runtime.h"
extern "C" void objc_msgSend(void);
extern "C" void objc_msgSend_stret(void);
extern "C" void objc_msgSend_fpret(void);
