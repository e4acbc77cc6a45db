"""
The backend (``twistd cluster-backend``).

  - L{service}: its options, the counted service and draining;
  - L{counting}: counting a service's connections without changing it;
  - L{reporter}: registering with the balancers and reporting load;
  - L{echo}: the built-in echo service;
  - L{metrics}: its optional metrics listener (--metrics);
  - L{web}: a twisted.web site that ends keep-alive when the backend drains.
"""
