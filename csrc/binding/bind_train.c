/* bind_train.c — Python functions of the train area (to be filled by that area). */
#include "bind.h"

int rd_bind_train(PyObject *m) { (void)m; return 0; }
