/* bind_moe.c — Python functions of the moe area (to be filled by that area). */
#include "bind.h"

int rd_bind_moe(PyObject *m) { (void)m; return 0; }
