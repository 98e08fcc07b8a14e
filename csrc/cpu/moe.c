/* moe.c — the MoE block (to be implemented). */
#include "../racedit.h"

static const char *const gating_names[3] = {"identity", "sigmoid", "softmax"};
const char *rd_gating_name(rd_gating g) { return (unsigned)g < 3 ? gating_names[g] : "?"; }
