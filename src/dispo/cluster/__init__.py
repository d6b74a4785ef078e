"""Many hosts behind one address, on Ray (docs/scale-out.md, issue 24).

- A **node** (`dispod --ray ADDRESS`, node.py) is dispod as on one host, which also starts this host's Ray
  node (a raylet, `ray start --address ADDRESS --block`, in its own process group) and, as a Ray driver, one
  named actor pinned to that node (agent.py): the node's *agent*, which answers what the node can take.
- The **gateway** (`dispod --gateway --ray ADDRESS`, gateway.py) serves the same REST API with no sessions of
  its own: it asks every agent, places each new session on a node with room, and relays everything else to
  the node that holds the session, with the cluster's secret (secret.py), never a user's token.

Why an agent actor rather than Ray resources alone: Ray's custom resources are fixed when a raylet starts,
while a node's free session slots change with every session (sessions started on the node itself, by its
own CLI, take slots Ray would not know of). Ray gives what it is good at: membership (the agents' names),
a placement that is really on the node (NodeAffinitySchedulingStrategy, not soft), and death (an agent
dies with its owner, the node's dispod, and with its raylet). The numbers come live from the node's dispod,
which still admits or refuses each session (429) itself: the gateway's view is a hint, never the authority.

Ray is an optional dependency (`pip install dispo[cluster]`): nothing outside this package imports it, and
this package is imported only when dispod is started with --ray.
"""
