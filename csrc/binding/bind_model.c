/* bind_model.c — Python functions of the model area (to be filled by that area). */
#include "bind.h"

int rd_bind_model(PyObject *m) { (void)m; return 0; }
