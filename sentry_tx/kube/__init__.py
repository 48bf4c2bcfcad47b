# -*- test-case-name: tests.test_kube_client,tests.test_kube_informer -*-
"""
The Kubernetes API client of kubernetes mode, its connection settings, and
the informers that keep Pods and Configurations cached.
"""
