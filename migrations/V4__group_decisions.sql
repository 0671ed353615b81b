-- Decisions taken many per transaction: the coordinator names each new hold
-- itself (a UUID it generates), so that one set-based INSERT can create the
-- holds of a whole group and the batches that point at them.
GRANT INSERT (id) ON holds TO holdfast_coordinator;
