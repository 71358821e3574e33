"""The alignment pipeline: DAG definition, compiler entry point, scheduler and local runner."""
