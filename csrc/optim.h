/* optim.h — declared by the optim area. Included by racedit.h. */
#ifndef RACEDIT_OPTIM_H
#define RACEDIT_OPTIM_H

#endif
