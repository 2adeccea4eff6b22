"""Everything about a model: loading, units, formats and quantizers, calibration data,
sensitivity metrics, costs, evaluation, artifacts and exports. Knows nothing of HTTP or
databases (that is ``service``) and hands ``search`` plain arrays."""
