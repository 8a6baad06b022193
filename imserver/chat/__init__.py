"""
The business layer: the operations of wire protocol v1 (send, ack, sync,
read, unread, conversations, history, recall, profiles), independent of the
transport that carries them and of the storage that keeps them.
"""
