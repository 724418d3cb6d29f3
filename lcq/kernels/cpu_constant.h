/* Switch cases that turn a small runtime count into a compile-time constant: CALL(n) for case n.
 * The C kernels inline their register tiles with the count a constant (accumulator arrays then live
 * in registers), so each call site dispatches on the count once, outside its hot loop. */
#ifndef LCQ_CPU_CONSTANT_H
#define LCQ_CPU_CONSTANT_H

#define LCQ_CASES_1_TO_5(CALL)                                                                                  \
    case 1: CALL(1); break;                                                                                     \
    case 2: CALL(2); break;                                                                                     \
    case 3: CALL(3); break;                                                                                     \
    case 4: CALL(4); break;                                                                                     \
    case 5: CALL(5); break;

#define LCQ_CASES_1_TO_7(CALL)                                                                                  \
    LCQ_CASES_1_TO_5(CALL)                                                                                      \
    case 6: CALL(6); break;                                                                                     \
    case 7: CALL(7); break;

/* Passes over rows 0 .. M - 1 of `pass_rows` rows each (the last may be shorter), m the first row of a
 * pass: CALL(R) with R the pass's row count as a constant, MOST (<= 8) for a full pass of 8 or more. */
#define LCQ_ROW_PASSES(M, pass_rows, MOST, CALL)                                                                \
    for (int m = 0; m < (M); m += (pass_rows)) {                                                                \
        switch ((M) - m < (pass_rows) ? (M) - m : (pass_rows)) {                                                \
            LCQ_CASES_1_TO_7(CALL)                                                                              \
            default: CALL(MOST); break;                                                                         \
        }                                                                                                       \
    }

/* The loop over a decode product's output columns (cpu_index.c, cpu_half.c: fewer than
 * lcq_gemm_min_rows(...) rows). Guided: each thread takes large contiguous chunks first (it streams its
 * weights in order), then smaller ones down to 32 columns, so a thread that runs slower for a while
 * (this VM's two vCPUs differed by 10-15% in profiles) does not keep the other waiting at the end.
 * Against static halves, the schedules alternating in one process (SmolLM2 W4, 2 threads, Zen 4):
 * batch-1 decode 1.07-1.09x in three comparisons and 1.00-1.01x in two later ones (in a slower phase
 * of the VM), 4 sequences 1.0-1.06x; never slower. Dynamic chunks of 16 columns ran 0.7x (each
 * thread's stream of weights broken up), of 128 1.0x. */
#define LCQ_DECODE_COLUMNS _Pragma("omp parallel for schedule(guided, 32)")

#endif
