"""`millis eval`: task accuracy of a model or artifact on labelled data (see `run`)."""
