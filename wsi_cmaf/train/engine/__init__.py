"""The trainer: the three-stage loop (:mod:`.trainer`, :mod:`.loop`, :mod:`.stages`), its state and
checkpoints, schedules, SAM and gradient clipping, validation during training and logging."""
