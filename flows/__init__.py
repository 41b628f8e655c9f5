"""Prefect flows: validate incoming images, train the stages as jobs, evaluate, register, promote, deploy.

``flows`` uses ``components`` (the ML core) and ``storage`` (the registry); nothing here is imported by them.
"""
