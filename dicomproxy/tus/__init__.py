"""TUS uploads (issue 3): a tusd-compatible resumable upload server."""
