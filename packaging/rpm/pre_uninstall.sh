# gpuops %preun: on erase (not upgrade) stop and disable both services.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
	systemctl disable --now gpuops-agent.service gpuops-bot.service || :
fi
