"""Sans-IO: the wire protocol, TLS ClientHello parsing, names and allowlists.

Nothing here touches a socket, a clock or an event loop; tests feed it bytes.
"""
