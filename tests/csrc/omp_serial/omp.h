/* <omp.h> for building fused_cpu's core for aarch64 with zig cc, which ships no OpenMP
 * runtime (used by tests/test_cpu_aarch64.py only, never by the library's own build):
 * - without -fopenmp (the static test executable run under qemu-aarch64), the core's
 *   `#pragma omp` lines are ignored and it runs on one thread, which these inline
 *   definitions describe;
 * - with -fopenmp (the shared library built with the variant's own flags, to show that it
 *   builds; not run), only the declarations: the runtime would define them. */
#ifndef MOEFRAME_OMP_SERIAL_H
#define MOEFRAME_OMP_SERIAL_H
#ifdef _OPENMP
int omp_get_num_threads(void);
int omp_get_thread_num(void);
int omp_get_max_threads(void);
#else
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_max_threads(void) { return 1; }
#endif
#endif
