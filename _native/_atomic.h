/*
 * The only atomic primitives the ledger uses, as GCC/Clang __atomic builtins on
 * 8-byte aligned 64-bit cells of a MAP_SHARED mapping (lock-free on x86-64 and
 * aarch64, so they work across processes). No 16-byte CAS: it is not reliably
 * lock-free on every CPU we run on.
 *
 * Arithmetic is done on uint64_t and cast back, so overflow wraps (two's
 * complement) instead of being undefined behaviour on int64_t.
 *
 * Orders: loads acquire, stores release, read-modify-writes acq_rel. Every
 * decision in the ledger is a CAS on one cell, so no cross-cell ordering
 * beyond that is needed (on x86 every lock-prefixed RMW is a full barrier anyway).
 */
#ifndef ZAIPROXY_ATOMIC_H
#define ZAIPROXY_ATOMIC_H

#include <stdint.h>

#if !defined(__GNUC__) && !defined(__clang__)
#error "_native/_atomic.h needs the GCC/Clang __atomic builtins"
#endif

static inline int64_t zl_load(const int64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void zl_store(int64_t *p, int64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* Strong CAS. On failure *expected receives the current value. Returns 1 on success. */
static inline int zl_cas(int64_t *p, int64_t *expected, int64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Returns the new value; wraps on overflow. */
static inline int64_t zl_add(int64_t *p, int64_t delta) {
    return (int64_t)__atomic_add_fetch((uint64_t *)p, (uint64_t)delta, __ATOMIC_ACQ_REL);
}

/* Returns the old value. */
static inline int64_t zl_exchange(int64_t *p, int64_t v) {
    return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL);
}

/* ceil(a * b / c) for a, b >= 0, c >= 1, without overflow; saturates at INT64_MAX. */
static inline int64_t zl_ceil_muldiv(int64_t a, int64_t b, int64_t c) {
    unsigned __int128 p = (unsigned __int128)(uint64_t)a * (uint64_t)b;
    unsigned __int128 q = (p + (uint64_t)c - 1) / (uint64_t)c;
    return q > (unsigned __int128)INT64_MAX ? INT64_MAX : (int64_t)q;
}

/* floor(a * b / c) for a, b >= 0, c >= 1, without overflow; saturates at INT64_MAX. */
static inline int64_t zl_floor_muldiv(int64_t a, int64_t b, int64_t c) {
    unsigned __int128 q = (unsigned __int128)(uint64_t)a * (uint64_t)b / (uint64_t)c;
    return q > (unsigned __int128)INT64_MAX ? INT64_MAX : (int64_t)q;
}

#endif
