# Tasks (GLUE/MNLI) register here; translation uses fairseq's own tasks.
