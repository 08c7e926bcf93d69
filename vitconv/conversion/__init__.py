"""Reading a checkpoint onto the canonical model and writing it out: the one conversion service
(read -> map -> (resample) -> ask the target -> write -> verify -> commit), batches of them,
and the canonical model loaded from any checkpoint."""
