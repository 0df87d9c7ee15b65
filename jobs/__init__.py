"""Pipeline jobs: one module per job, each a typed function usable from Python, the CLI and Airflow."""
