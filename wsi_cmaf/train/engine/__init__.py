"""The trainer: the three-stage loop (:mod:`.trainer`, :mod:`.loop`, :mod:`.stages`), its state and
checkpoints, schedules, SAM, gradient clipping (:mod:`.clipping`), mixed precision (:mod:`.amp`),
validation during training and logging."""
