/* types.h: the fixed-size integers every other header uses, Linux style. */
#ifndef GUEST_TYPES_H
#define GUEST_TYPES_H

#include <stdbool.h>	/* freestanding headers: they come with the compiler */
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int8_t s8;
typedef int64_t s64;

#define noreturn __attribute__((noreturn))
#define packed __attribute__((packed))

#endif
