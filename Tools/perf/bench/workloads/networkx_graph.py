# networkx on a random graph: shortest paths, centrality, components.
from debian import use

nx = use("networkx")

GRAPH = nx.gnp_random_graph(400, 0.03, seed=1)


def run():
    dict(nx.all_pairs_shortest_path_length(GRAPH))
    nx.betweenness_centrality(GRAPH, k=40, seed=1)
    list(nx.connected_components(GRAPH))
    nx.minimum_spanning_tree(GRAPH)
