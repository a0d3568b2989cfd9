"""Process plumbing: the buffering Gunicorn worker, devices and staging, threads and the cores' share."""
