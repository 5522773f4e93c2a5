"""What a bench measures and predicts per plan (shared by its results, plots and calibration)."""

METRICS = ("decode_tps", "prefill_tps", "ttft_s")  # measured and predicted, per plan
FIT_METRICS = ("decode_tps", "ttft_s")  # what calibration fits and its error is reported over
