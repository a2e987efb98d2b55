"""The ``tapeflow`` command line and what it shows people: the run summary, the daily report,
status and health. Separate from the dataflow wiring in ``dataflows/``, which never imports it."""
