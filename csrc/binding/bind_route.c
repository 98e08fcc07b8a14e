/* bind_route.c — Python functions of the route area (to be filled by that area). */
#include "bind.h"

int rd_bind_route(PyObject *m) { (void)m; return 0; }
