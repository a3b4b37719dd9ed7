/*
 * fct_try.h (internal): FCT_TRY, the early return on a failing fct_status
 * that every file in ops/ uses (entry points, backends, engines, kernels'
 * wrappers): the status of the first failing step is the call's status, and
 * the message that step wrote into the context stays the one the caller sees.
 */
#ifndef FCT_TRY_H
#define FCT_TRY_H

#define FCT_TRY(expr)            \
  do {                           \
    fct_status s_ = (expr);      \
    if (s_ != FCT_OK) return s_; \
  } while (0)

#endif /* FCT_TRY_H */
