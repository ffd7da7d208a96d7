"""The tensor-parallel process group and its collectives: the lowest backend layer (it imports no other).

Models call its collectives (the row-parallel all-reduce, the logits gather);
runners start and join the group. A process that never joined a group is a
world of one, and every collective is then the identity.
"""
