-- Runs once, when the Postgres volume is first initialised: a separate database for MLflow's tracking store.
CREATE DATABASE mlflow;
