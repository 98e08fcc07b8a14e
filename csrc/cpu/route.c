/* route.c — the six selection strategies of SPEC §2 (to be implemented). */
#include "../racedit.h"

static const char *const strategy_names[RD_NUM_STRATEGIES] = {"token", "expert", "bl", "be", "le", "race"};
const char *rd_strategy_name(rd_strategy s) {
    return (unsigned)s < RD_NUM_STRATEGIES ? strategy_names[s] : "?";
}
