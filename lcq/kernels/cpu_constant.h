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

#endif
