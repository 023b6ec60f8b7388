"""The engine: scheduler, the step, output processing, the thread-safe runner the server uses."""
