/* bind_losses.c — Python functions of the losses area (to be filled by that area). */
#include "bind.h"

int rd_bind_losses(PyObject *m) { (void)m; return 0; }
