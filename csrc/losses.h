/* losses.h — declared by the losses area. Included by racedit.h. */
#ifndef RACEDIT_LOSSES_H
#define RACEDIT_LOSSES_H

#endif
