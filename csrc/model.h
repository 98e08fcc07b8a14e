/* model.h — declared by the model area. Included by racedit.h. */
#ifndef RACEDIT_MODEL_H
#define RACEDIT_MODEL_H

#endif
