"""
The command lines: ``cluster-admin`` (L{admin}; its ``top`` in L{top}), ``cluster-connect``
(L{connect}), ``cluster-local`` (L{local}); what they share is in
L{common}.
"""
