"""The service: settings, CLI, persistence, queueing, HTTP API and dashboard. The only
package that knows models (``quant``), solvers (``search``) and storage at once."""
