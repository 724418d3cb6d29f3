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

#endif
