"""
The Kubernetes API client of kubernetes mode, its connection settings, and
the informers that keep Pods and Configurations cached.
"""
