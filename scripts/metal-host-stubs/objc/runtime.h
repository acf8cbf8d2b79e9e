// Stand-in for the Apple SDK header of the same name: only what metal-cpp needs to be
// parsed on Linux by scripts/check-metal-host.sh. Never used in a real build.
#pragma once
#include <cstddef>
typedef struct objc_class* Class;
struct objc_object { Class isa; };
typedef struct objc_object* id;
typedef struct objc_selector* SEL;
typedef signed char BOOL;
typedef struct objc_object Protocol;
extern "C" SEL sel_registerName(const char*);
extern "C" id objc_lookUpClass(const char*);
extern "C" Protocol* objc_getProtocol(const char*);
