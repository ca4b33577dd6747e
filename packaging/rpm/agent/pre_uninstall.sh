# gpuops-agent %preun: on erase (not upgrade) stop and disable the agent.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
	systemctl disable --now gpuops-agent.service || :
fi
