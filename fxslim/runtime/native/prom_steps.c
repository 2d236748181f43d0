/* A direct plan's steps in one call (prom_direct.py). Each step is a C function: oneDNN's
 * dnnl_primitive_execute(primitive, stream, count, args), or a native kernel taking one pointer to its
 * parameters. From Python every step cost a ctypes call, 1-3 µs with caches cold after the kernel
 * before it (MobileNetV2: 52 steps); here a plan pays one.
 */
#include <stdint.h>

typedef struct {
    void *fn;
    void *a, *b;   /* the first two arguments (a alone for a one-argument step) */
    int64_t count; /* the third, an int, of a four-argument step */
    void *args;    /* the fourth */
    int64_t arity; /* 4 or 1 */
} prom_step;

typedef int (*four_arguments)(void *, void *, int, void *);
typedef int (*one_argument)(void *);

/* Runs the n steps in order; returns 0, or (index + 1) * 2^32 + status of the first that returned a
 * status other than 0 (the steps after it do not run). */
int64_t prom_run_steps(const prom_step *steps, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const prom_step *s = steps + i;
        int status = s->arity == 4 ? ((four_arguments)s->fn)(s->a, s->b, (int)s->count, s->args)
                                   : ((one_argument)s->fn)(s->a);
        if (status != 0)
            return ((i + 1) << 32) + (uint32_t)status;
    }
    return 0;
}
