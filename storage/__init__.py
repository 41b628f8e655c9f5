"""Object storage for tocoad: the S3 artifact store, the model and dataset registries, and the local S3 server.

This package is the only place that talks to S3 (through the ``minio`` SDK). The ML core in ``components/``
never imports it; flows, serving and the command line do.
"""
