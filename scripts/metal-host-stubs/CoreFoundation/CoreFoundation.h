// Stand-in for the Apple SDK header of the same name: only what metal-cpp needs to be
// parsed on Linux by scripts/check-metal-host.sh. Never used in a real build.
#pragma once
#include <cstdint>
typedef const void* CFTypeRef;
typedef double CFTimeInterval;
typedef long CFIndex;
typedef unsigned long CFOptionFlags;
typedef const struct __CFString* CFStringRef;
typedef const struct __CFDictionary* CFDictionaryRef;
typedef unsigned int UInt32;
#define CF_ENUM(t, n) enum n : t
#include <cmath>
typedef struct dispatch_data_s* dispatch_data_t;
typedef struct dispatch_queue_s* dispatch_queue_t;
