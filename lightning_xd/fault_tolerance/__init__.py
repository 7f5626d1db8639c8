"""Surviving failures: in-job recovery (ULFM), training data that resumes mid-epoch, verified
checkpoints and the callback that writes them, the supervisor that restarts a job, and the
callbacks that inject faults and mark progress for it."""
