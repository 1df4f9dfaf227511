# A host with several problems at once, for the README's `tcpstate doctor` run. As root, with
# an agent running:
#   ip netns add demo && ip -n demo link set lo up
#   ip netns exec demo sysctl -w net.ipv4.ip_local_port_range="40000 40399" net.ipv4.tcp_tw_reuse=0
#   ip netns exec demo python3 deploy/examples/doctor-scenario.py &   # wait for "ready"
#   sleep 15; tcpstate doctor                                          # after the next dump
#   ip netns del demo
# It holds its sockets for 10 minutes (or argv[1] seconds).
import socket, struct, threading, time, os, sys

held = []

def listener(port, backlog=512):
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", port)); l.listen(backlog)
    held.append(l)
    return l

# 1. An API on 8080 that leaks CLOSE_WAIT: 40 clients from two addresses close, it never does.
api = listener(8080)
for i in range(40):
    c = socket.socket(); c.bind((f"127.0.0.{5 + i % 2}", 0)); c.connect(("127.0.0.1", 8080))
    s, _ = api.accept(); held.append(s); c.close()

# Let the leak age past the default linger threshold (60 s) while what follows is young.
time.sleep(int(os.environ.get('AGE', '55')))

# 2. A cache on 6379 whose clients reset: SO_LINGER 0, 30 times.
cache = listener(6379)
for i in range(30):
    c = socket.socket(); c.connect(("127.0.0.1", 6379)); s, _ = cache.accept()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close()
    time.sleep(0.01); s.close()

# 3. A worker connecting to a database on 5432 that is down: 12 refused connects.
for i in range(12):
    try:
        socket.create_connection(("127.0.0.1", 5432))
    except ConnectionRefusedError:
        pass

# 4. A client hammering a service on 9000 with short connections it closes first.
svc = listener(9000)
def serve():
    while True:
        s, _ = svc.accept(); s.recv(1); s.close()
threading.Thread(target=serve, daemon=True).start()
n = 0
for i in range(360):
    c = socket.create_connection(("127.0.0.1", 9000)); c.close(); n += 1
print("short connections to 9000:", n, flush=True)

# 5. A server on 7000 that closes first toward clients that never close: orphaned FIN_WAIT_2.
web = listener(7000)
for i in range(25):
    c = socket.create_connection(("127.0.0.1", 7000)); s, _ = web.accept(); s.close(); held.append(c)

print("ready", os.getpid(), flush=True)
time.sleep(int(sys.argv[1]) if len(sys.argv) > 1 else 600)
